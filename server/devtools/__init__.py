"""Development tools, apart from the service (which never imports them): the `bin/serve`
launcher, the embedded Redis, the demo data, and the process harness that tests/ and bench/
use to run the Procfile's commands."""
