# Sourced by the benchmarks that put nginx beside the store server as its baseline
# (store-server.sh, cpu.sh): nginx serving a `file://` binary cache with sendfile, as a file
# server at its cheapest. `nginx_conf DIR LISTEN WORKERS CONNECTIONS ROOT` writes DIR/nginx.conf
# (its pid, logs and temporary files under DIR/nginx) for `nginx -c DIR/nginx.conf -g 'daemon off;'`.
nginx_conf() {
    local dir=$1 listen=$2 workers=$3 conns=$4 root=$5
    mkdir -p "$dir/nginx"
    cat >"$dir/nginx.conf" <<NGX
worker_processes $workers;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log;
events { worker_connections $conns; }
http {
  access_log off;
  sendfile on; tcp_nopush on;
  client_body_temp_path $dir/nginx; proxy_temp_path $dir/nginx; fastcgi_temp_path $dir/nginx;
  uwsgi_temp_path $dir/nginx; scgi_temp_path $dir/nginx;
  server { listen $listen; root $root; }
}
NGX
}
