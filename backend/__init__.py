"""The Label Studio ML backend service (see the backend issue); uses `model/`, never the reverse."""
