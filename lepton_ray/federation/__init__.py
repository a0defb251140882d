"""Federation across organisations: pure building blocks, no Ray.

- :mod:`~lepton_ray.federation.provision`: the federation file, the certificate authority, one
  startup kit per site (X.509 certificate and key for mutual TLS, Ed25519 SecAgg identity, the
  CA-signed roster) and loading a kit back with every check a site must make.
- :mod:`~lepton_ray.federation.wire`: the explicit, versioned, size-limited schema that every
  message crossing a trust boundary is encoded with (never pickle), vectors in chunks.
- :mod:`~lepton_ray.federation.policy`: a site's policy and the check of a job spec against it.
- :mod:`~lepton_ray.federation.transport` (needs grpcio): gRPC over TLS 1.3 with mutual
  authentication; sites dial out to the coordinator.

See README "Federation across organisations" and shared/DESIGN.md "Trust domains".
"""
