"""llmpipe's own glue: the project definition (the stage registry), the `llmpipe` command line and
the embedded demo corpus. The orchestrator is `pipeline`, the stages are `stages`."""
