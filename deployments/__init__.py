"""How Tessera's flows are executed: the embedded stack (services.py, and interrupted.py for the runs it stopped
under), the local runner (serve.py) and deploy.py for work pools."""
