"""Pure protocol logic (sans-I/O): wire schema, batch format, node state machine."""
