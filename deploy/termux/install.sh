#!/data/data/com.termux/files/usr/bin/bash
# Install the edge-sdk device agent on Android under Termux (F-Droid build), and start it
# at boot with Termux:Boot.
#   bash install.sh /path/to/edge-sdk-source [agent.toml] [root.json]
set -euo pipefail
SRC=${1:?usage: install.sh SOURCE_DIR [agent.toml] [root.json]}
CONF=${2:-}
ROOT_JSON=${3:-}
PREFIX=${PREFIX:-/data/data/com.termux/files/usr}
HOME_DIR=${HOME:-/data/data/com.termux/files/home}
AGENT_HOME="$HOME_DIR/.edge-agent"

pkg update -y
# numpy and onnxruntime come as Termux packages (pip has no Android wheels for them).
pkg install -y python python-numpy python-onnxruntime python-cryptography python-psutil termux-api
python -m venv --system-site-packages "$AGENT_HOME/venv"
"$AGENT_HOME/venv/bin/pip" install --no-deps "$SRC"
"$AGENT_HOME/venv/bin/pip" install 'paho-mqtt>=2.0,<3'

install -d -m 0700 "$AGENT_HOME" "$AGENT_HOME/data"
[ -n "$CONF" ] && install -m 0600 "$CONF" "$AGENT_HOME/agent.toml"
[ -n "$ROOT_JSON" ] && install -m 0600 "$ROOT_JSON" "$AGENT_HOME/root.json"

# Update gate: hold installs while the battery is low (termux-battery-status needs Termux:API).
cat > "$AGENT_HOME/may-update" <<'GATE'
#!/data/data/com.termux/files/usr/bin/bash
pct=$(termux-battery-status | python -c 'import json,sys; print(json.load(sys.stdin)["percentage"])')
if [ "$pct" -lt 30 ]; then echo "battery at ${pct}%"; exit 1; fi
GATE
chmod 0700 "$AGENT_HOME/may-update"

install -d "$HOME_DIR/.termux/boot"
cat > "$HOME_DIR/.termux/boot/edge-agent" <<BOOT
#!/data/data/com.termux/files/usr/bin/sh
termux-wake-lock
exec "$AGENT_HOME/venv/bin/edge-agent" run --config "$AGENT_HOME/agent.toml" \
    --update-gate-command "$AGENT_HOME/may-update" >>"$AGENT_HOME/agent.log" 2>&1
BOOT
chmod 0700 "$HOME_DIR/.termux/boot/edge-agent"
echo "installed; edit $AGENT_HOME/agent.toml (data_dir = \"$AGENT_HOME/data\", root = \"$AGENT_HOME/root.json\")"
echo "then reboot, or run: sh $HOME_DIR/.termux/boot/edge-agent &"
