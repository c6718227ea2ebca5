"""`tessera serve`: Tessera's HTTP surfaces in one FastAPI server, thin layers over flows.foundation_model."""
