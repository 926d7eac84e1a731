"""The run server: ``preemptwatch server``.

`app.create_app` builds the aiohttp application; `store.RunStore` holds every state change
of a run as one atomic SQL transition; `reaper`, `heartbeats`, `storage` and `migrations`
do what their names say. See ``docs/http-api.md`` for the HTTP contract.
"""
