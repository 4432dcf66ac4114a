"""RestoreLCC: collected activations, head directions and probe, compensation."""
