"""End-to-end harness: the strict emulator + the real operator + a fake kubelet running real pods.

See tests/e2e/kubelet.py for what the fake kubelet does and does not emulate.
"""
