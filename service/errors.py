"""The service's root exception. Each subsystem defines its own subclasses.

::

    BridgeError
    ├── config.SettingsError            a setting is missing or has a bad value
    ├── kafka.topics.TopicError         a topic is missing or set up wrong (one line says how)
    ├── kafka.errors.FatalKafkaError    the producer was fenced or Kafka failed fatally
    ├── kafka.errors.StaleEffect        an effect for a partition this replica no longer owns
    ├── documents.DocumentMissing       a pending request's document cannot be read back
    ├── fetch.FetchError                a document URL could not be downloaded (fetch mode)
    │   ├── TransientFetchError         a later attempt may succeed (timeout, 5xx, ...)
    │   ├── SourceUnavailable           the source failed for good (404, empty body, ...)
    │   ├── DocumentTooLarge            the document is above the size limit
    │   ├── ForbiddenAddress            the host resolves to a refused (private) address
    │   └── InvalidURL                  not an http(s) URL with a host
    ├── ratelimit.LimiterError          LimiterTimeout (no permit in time), LimiterClosed
    └── tools.ToolError                 a command-line tool could not do what was asked

The DocuTray client's errors (``service.docutray.DocuTrayError``) form their
own tree, drawn in that module, because they describe the remote API.
"""


class BridgeError(Exception):
    """Root of the bridge's own errors."""
