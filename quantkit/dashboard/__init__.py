"""`quantkit serve`: a read-only web dashboard of the job queue and the builds (docs/jobs.md).

- public.py: what a page may show: local absolute paths and secrets taken out of every string.
- views.py: the typed rows and pages, made from the queue's Jobs and the builds' report.json.
- app.py: the Starlette application (GET routes only, Jinja templates that escape everything).
- serve.py: binds the address (127.0.0.1 unless asked) and runs it under uvicorn.
"""
