"""The steps of a Tessera run, one module each, and the packages they stand on."""
