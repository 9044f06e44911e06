#!/bin/sh
# Render callbridge's dialplan/ templates ({{NAME}} placeholders) into one instance dir and
# run Asterisk in the foreground. Values come from the environment (docker-compose.yml).
set -eu
INSTANCE_DIR=/var/lib/callbridge-asterisk
MOD_DIR=$(dirname "$(find /usr/lib -name chan_pjsip.so | head -n 1)")
mkdir -p "$INSTANCE_DIR/etc" "$INSTANCE_DIR/lib" "$INSTANCE_DIR/spool" "$INSTANCE_DIR/run" \
         "$INSTANCE_DIR/log" "$INSTANCE_DIR/cache"
for f in /opt/callbridge/dialplan/*.conf; do
  sed -e "s|{{INSTANCE_DIR}}|$INSTANCE_DIR|g" \
      -e "s|{{INSTANCE_NAME}}|callbridge|g" \
      -e "s|{{MOD_DIR}}|$MOD_DIR|g" \
      -e "s|{{HTTP_PORT}}|${HTTP_PORT:-8088}|g" \
      -e "s|{{SIP_PORT}}|${SIP_PORT:-5060}|g" \
      -e "s|{{ARI_USERNAME}}|${ARI_USERNAME:-callbridge}|g" \
      -e "s|{{ARI_PASSWORD}}|${ARI_PASSWORD:?set ARI_PASSWORD}|g" \
      -e "s|{{RTP_START}}|${RTP_START:-16000}|g" \
      -e "s|{{RTP_END}}|${RTP_END:-16999}|g" \
      -e "s|{{TONE_COUNTRY}}|${TONE_COUNTRY:-us}|g" \
      -e "s|{{FALLBACK_DIAL}}|${FALLBACK_DIAL:-}|g" \
      -e "s|{{UAS_PORT}}|${UAS_PORT:-5090}|g" \
      -e "s|{{UAS_AUTH_USER}}|uasuser|g" \
      -e "s|{{UAS_AUTH_PASSWORD}}|uassecret|g" \
      -e "s|{{NAME}}|callbridge|g" \
      "$f" > "$INSTANCE_DIR/etc/$(basename "$f")"
done
chown -R asterisk:asterisk "$INSTANCE_DIR"
exec /usr/sbin/asterisk -f -U asterisk -G asterisk -n -C "$INSTANCE_DIR/etc/asterisk.conf"
