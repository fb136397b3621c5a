"""One image under the microscope (issue 14): being built; see docs/inspect.md."""
