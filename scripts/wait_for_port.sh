# Sourced by the benchmark scripts. wait_for_port PORT: returns once a server accepts
# connections on 127.0.0.1:PORT (polling, not sleeping for readiness); fails after 2 s.
wait_for_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}
