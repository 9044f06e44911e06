# Asterisk 22 from Debian sid's package (bookworm has none), configured from dialplan/.
FROM debian:sid-slim
RUN echo 'Acquire::Check-Valid-Until "false";' > /etc/apt/apt.conf.d/99no-expiry \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      asterisk asterisk-modules asterisk-core-sounds-en \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY dialplan/ /opt/callbridge/dialplan/
COPY docker/asterisk-entrypoint.sh /usr/local/bin/asterisk-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/asterisk-entrypoint.sh"]
