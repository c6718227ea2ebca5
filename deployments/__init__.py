"""How Tessera's flows are served: deploy.py puts them on a work pool, worker.py runs a worker of it, serve.py is
the embedded default's own pool and worker."""
