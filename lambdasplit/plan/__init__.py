"""Choosing the split points: device and cloud profiles, the link, and a privacy target.

    profile.py   a machine's measured cost of each part of a model (`lambdasplit profile`)
    wirecost.py  bytes and codec time per step, from the wire codecs and real frame headers
    planner.py   the cost model, leakage per split, and the search for the fastest split that meets a target
    scenario.py  a plan's inputs put together: profile files or this machine's, factors, link, assessment
    report.py    the table, the recommendation, the JSON

The commands `lambdasplit profile` and `lambdasplit plan` are in lambdasplit/cli/plan.py.
"""
