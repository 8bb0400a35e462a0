"""Client runtimes beyond this process: PySyft datasites (``client.runtime=syft``; syft is imported only there)."""
