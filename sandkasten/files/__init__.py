"""Host-side access to what sandboxes wrote: workspaces (confined lookups beneath one
descriptor, tars in and out) and exec/process logs (tailing for streams, woken by inotify)."""
