"""Tessera's Prefect flows and its public face (`from flows import foundation_model as fm`)."""
