"""The `sandkasten` command (Fire): `main` runs it; `admin` holds audit, journal, doctor, security
and version; `args` checks arguments; `render` draws tables; `attach` is the terminal of
`sandkasten attach`."""
