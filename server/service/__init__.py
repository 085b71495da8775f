"""The use cases: each is a transaction around a domain operation, then its side effects
after commit (the web shop with its catalog and group commit, expiry scheduling). Imports
storage, wire, domain and infra."""
