"""A Kubernetes API without a cluster, for the operator, e2e and fault tests.

- `kube.emulator.StrictKubernetesEmulator`: kmock==0.8 emulator made strict enough for
  kopf and kubectl (metadata, conflicts, subresources, finalizers, GC, selectors, resumable
  watches, CRD admission with OpenAPI + CEL, Table and OpenAPI v3 for kubectl).
- `kube.crd`: the API server's CRD admission (defaults, unknown fields, schema, CEL).
- `kube.cluster.Cluster`: the emulator served from a background thread, a small sync
  client, `kubeconfig()` for kubectl, `wait_for()`.
- `kube.operator_runner.OperatorRunner`: the real operator in-process (start/stop/restart).
- `kube.pods`: pods of a Deployment and the kubelet's states, for tests that play kubelet.
- `kube.selectors`: label and field selectors.
"""
