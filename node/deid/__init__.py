"""De-identification for the route to services outside the hospital (PS3.15 Annex E)."""
