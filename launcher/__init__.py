"""moelab's control plane on the head node: compose, validate, plan, render, launch."""
