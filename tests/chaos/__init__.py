"""The chaos suite: faults injected into real bridge processes, and a history checker."""
