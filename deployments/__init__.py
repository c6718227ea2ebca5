"""How Tessera's flows are executed: the embedded stack (services.py, and interrupted.py for the runs it stopped
under), deploy.py puts the flows on a work pool, worker.py runs a worker of it, serve.py is the embedded default's
own pool and worker."""
