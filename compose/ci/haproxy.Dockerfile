# A stand-in for the official haproxy image that docker-compose.scale.yml names, for
# machines that reach no image registry (CI): Debian bookworm's HAProxy (2.6, the same
# minor version) on the debootstrap root compose/ci/test-compose.sh imports, reading its
# configuration where the official image does and running in the foreground as it does.
# test-compose.sh tags it with exactly the name the compose file uses; where the real
# image can be pulled, it is used instead and this file plays no part.
ARG ROOTFS
FROM ${ROOTFS}
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
