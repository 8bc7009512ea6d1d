"""The benchmarks behind the figures in docs/: one module per `lambdasplit bench …` command.

Each runs real server processes (harness.py: behind an emulated link where it matters), and writes its
table, CSV, JSON and chart through lambdasplit.util.report.
"""
