"""The service's root exception. Each subsystem defines its own subclasses.

::

    BridgeError
    ├── config.SettingsError            a setting is missing or has a bad value
    ├── pipeline.FatalKafkaError        the producer was fenced or Kafka failed fatally
    └── pipeline.StaleEffect            an effect for a partition this replica no longer owns

The DocuTray client's errors (``service.docutray.DocuTrayError``) form their
own tree, drawn in that module, because they describe the remote API.
"""


class BridgeError(Exception):
    """Root of the bridge's own errors."""
