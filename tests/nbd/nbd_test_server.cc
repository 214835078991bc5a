// A stand-alone NBD front end for the interop tests (tests/nbd, tests/vm): serves the given
// exports on a port until SIGINT or SIGTERM. `ibdisk serve --nbd-port` is the product; this
// driver keeps the tests independent of the rest of the target.
//
//   nbd_test_server --export NAME=PATH[,ro][,shared] [--export ...] [--listen ADDR] [--port N]
//                   [--allow CIDR ...] [--tls psk:FILE|x509:DIR] [--log-level LEVEL]
// Prints "nbd_test_server: listening on ADDR:PORT" once it accepts connections.
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/error.h"
#include "common/log.h"
#include "target/acl.h"
#include "target/exports.h"
#include "target/nbd/nbd_server.h"
#include "target/nbd/tls.h"
#include "target/storage.h"
#include "transport/tcp/asio.h"

int main(int argc, char** argv) {
  CLI::App app{"Serve exports over NBD (test driver for the ibdisk NBD front end)"};
  std::vector<std::string> export_specs, allow;
  std::string listen = "127.0.0.1", level = "info", tls;
  std::uint16_t port = ibdisk::nbd::kDefaultPort;
  app.add_option("--export", export_specs, "NAME=PATH[,ro][,shared]")->required();
  app.add_option("--listen", listen, "address to listen on");
  app.add_option("--port", port, "TCP port (0: any free port)");
  app.add_option("--allow", allow, "allowed client network (CIDR); default: any");
  app.add_option("--tls", tls, "psk:FILE or x509:DIR: require TLS (as serve --nbd-tls)");
  app.add_option("--log-level", level, "trace, debug, info, warn, error or off");
  CLI11_PARSE(app, argc, argv);
  try {
    ibdisk::set_log_level(level);
    std::vector<ibdisk::target::ExportConfig> configs;
    for (const auto& s : export_specs) configs.push_back(ibdisk::target::parse_export_spec(s));
    ibdisk::target::ExportRegistry registry(configs);
    boost::asio::io_context io;
    ibdisk::target::StorageEngine engine(io, {});
    ibdisk::nbd::NbdServerOptions opts;
    if (!tls.empty()) opts.tls = ibdisk::nbd::NbdTls::from_spec(tls);
    ibdisk::nbd::NbdServer server(io, registry, engine, ibdisk::target::NetworkAllowList(allow),
                                  {boost::asio::ip::make_address(listen), port}, opts);
    boost::asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](const boost::system::error_code&, int) {
      server.stop();
      io.stop();
    });
    std::cout << "nbd_test_server: listening on " << listen << ":" << server.port() << std::endl;
    io.run();
  } catch (const std::exception& e) {
    std::cerr << "nbd_test_server: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
