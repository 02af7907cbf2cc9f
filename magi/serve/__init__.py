"""``magi serve``: MAGI-1 behind an HTTP API (python -m magi.serve; docs/SERVE.md).

- ``app``: the FastAPI app (``create_app``): error handlers, the page, the routes; no model;
- ``routes``: the ``/health`` and ``/v1/videos`` routes over the store;
- ``protocol``: request bodies and the video object (pydantic; the rules of ``magi.request``),
  the limits, the error JSON;
- ``media``: uploads, byte ranges, a job's segments followed live;
- ``store``: the SQLite job table (typed ``Job`` rows) and the jobs' files, shared with the worker;
- ``worker``: the one process that loads the pipeline and runs the jobs in order;
- ``__main__``: the command line: starts and supervises the worker, serves the app with uvicorn.

Nothing is imported here, so the worker needs neither FastAPI nor uvicorn.
"""
