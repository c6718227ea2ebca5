"""How Tessera's flows are served: the local runner (embedded default) and prefect.yaml for work pools."""
