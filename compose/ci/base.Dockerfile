# A stand-in for the official python image, for machines that reach no image registry
# (CI): Debian bookworm's own Python from a debootstrap root file system (imported by
# compose/ci/test-compose.sh), made to behave like the official image where
# compose/Dockerfile relies on it: `python` and `pip` on the PATH, pip allowed to install
# into the system Python, Python's headers present. The machine's CA bundle is added so
# that builds reach the package registries through this machine's TLS-inspecting egress.
# test-compose.sh tags the result with the exact name compose/Dockerfile pins, so the
# stack is built from compose/Dockerfile unchanged; where the real image can be pulled, it
# is used instead and this file plays no part.
ARG ROOTFS
FROM ${ROOTFS}
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt
# (rehash warns about the multi-certificate bundle file; the bundle itself takes it whole)
RUN update-ca-certificates >/dev/null 2>&1 \
    && grep -q "$(sed -n 2p /usr/local/share/ca-certificates/host-ca-bundle.crt)" \
        /etc/ssl/certs/ca-certificates.crt \
    && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \
    && ln -sf python3 /usr/bin/python \
    && ln -sf pip3 /usr/bin/pip
ENV LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
