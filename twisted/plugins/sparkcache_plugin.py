from twisted.application.service import ServiceMaker

sparkcache = ServiceMaker(
    "sparkcache",
    "sparkcache.tap",
    "A caching proxy for CI fleets (generic remotes, git, OCI, packages)",
    "sparkcache",
)
