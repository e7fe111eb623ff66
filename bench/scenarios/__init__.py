"""The four benchmark scenarios of issue 8, one module each; each `run(...)` returns a JSON-able dict."""
