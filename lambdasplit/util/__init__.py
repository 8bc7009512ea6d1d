"""Small helpers every layer may use: files written whole (atomic), JSON files with clear errors, and the
reports (Markdown, CSV, JSON, PNG) that benches, assessments and tuning leave behind. Imports nothing else
of lambdasplit."""
