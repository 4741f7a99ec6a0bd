"""The head's optional HTTP front: an OpenAI-compatible API (and, through hooks, metrics and a dashboard).

:func:`hexgen.head.http.app.create_app` builds the Starlette app; :func:`hexgen.head.http.app.serve_http`
runs it on uvicorn inside the head's event loop. Requests ride the same Redis streams as every other client.
"""
