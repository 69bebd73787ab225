"""The linear-attention family expressed as TTT rules (filled in by the family work)."""

__all__: list[str] = []
