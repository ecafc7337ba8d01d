"""Dev-stack parts no registry ships: local emulators of cloud KMS services and the helpers that
start the real servers on free 127.0.0.1 ports."""
