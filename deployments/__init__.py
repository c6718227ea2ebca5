"""How Tessera's flows are served: the local runner (embedded default) and deploy.py for work pools."""
