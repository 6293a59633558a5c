# Sourced at the start of the image's pip RUN steps (Dockerfile): with the build secret extra_ca
# (a TLS-intercepting proxy's CA), pip trusts it on top of the system bundle. The combined bundle
# is removed when the RUN's shell exits, so it never lands in a layer.
if [ -s /run/secrets/extra_ca ]; then
    cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca > /tmp/ca-bundle.pem
    export PIP_CERT=/tmp/ca-bundle.pem
    trap 'rm -f /tmp/ca-bundle.pem' EXIT
fi
