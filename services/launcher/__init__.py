"""The launcher: the `mso` CLI, the LauncherService, and the embedded mode that starts everything locally."""
