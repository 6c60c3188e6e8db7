"""The debugger's engine side: recording hook sites, shadow attention, pausing sessions."""
