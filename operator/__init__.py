"""The kopf operator: CRD contract, manifest builders, status, handlers."""
