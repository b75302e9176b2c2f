"""A software IC card that answers ISO 7816-4 APDUs for ISCL authentication."""
