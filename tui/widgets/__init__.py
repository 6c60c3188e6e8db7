"""The views: each binds to the main screen's cursor state and redraws itself (``base.View``)."""
