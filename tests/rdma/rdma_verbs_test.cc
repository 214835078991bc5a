// The RAII wrappers against a real Soft-RoCE device.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include "common/error.h"
#include "tests/rdma/rdma_env.h"
#include "transport/rdma/verbs.h"

namespace ibdisk::rdma {
namespace {

sockaddr_in addr_of(const std::string& ip, std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  ::inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  return a;
}

// The whole hierarchy builds on a bound id and tears down children first without error.
TEST(RdmaVerbs, ResourceHierarchyBuildsAndTearsDown) {
  IBDISK_REQUIRE_RDMA();
  EventChannel ch;
  CmId id(ch);
  const auto a = addr_of(testing::rdma_addr(), 0);
  id.bind(reinterpret_cast<const sockaddr*>(&a), testing::rdma_addr());
  ASSERT_NE(id.verbs(), nullptr) << "binding to the rxe0 address must select its device";
  ProtectionDomain pd(id.verbs());
  CompletionQueue cq(id.verbs(), 32);
  QueuePair qp(id, pd, cq, 16, 16);
  RegisteredBuffer buf(pd, 1 << 20, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
  EXPECT_NE(qp.get(), nullptr);
  EXPECT_EQ(buf.mr().length(), 1u << 20);
  EXPECT_NE(buf.mr().rkey(), 0u);
  const PortInfo port = query_port(id.verbs(), id->port_num);
  EXPECT_EQ(port.state, "ACTIVE");
  EXPECT_EQ(port.link_layer, "Ethernet");
  EXPECT_GE(port.active_mtu, 256);
}

// Binding to an address no RDMA device owns fails loudly, naming the call and a hint.
TEST(RdmaVerbs, BindToForeignAddressNamesCallAndHint) {
  IBDISK_REQUIRE_RDMA();
  EventChannel ch;
  CmId id(ch);
  const auto a = addr_of("10.99.99.99", 0);
  try {
    id.bind(reinterpret_cast<const sockaddr*>(&a), "10.99.99.99");
    FAIL() << "bind to an address that is on no interface must fail";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("rdma_bind_addr(10.99.99.99)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("RDMA-capable"), std::string::npos) << e.what();
  }
}

// Registering memory that is not mapped fails with a SystemError that names ibv_reg_mr.
TEST(RdmaVerbs, RegisteringUnmappedMemoryFails) {
  IBDISK_REQUIRE_RDMA();
  EventChannel ch;
  CmId id(ch);
  const auto a = addr_of(testing::rdma_addr(), 0);
  id.bind(reinterpret_cast<const sockaddr*>(&a), testing::rdma_addr());
  ProtectionDomain pd(id.verbs());
  EXPECT_THROW(
      {
        try {
          MemoryRegion mr(pd, reinterpret_cast<void*>(0x10), 4096, IBV_ACCESS_LOCAL_WRITE);
        } catch (const SystemError& e) {
          EXPECT_NE(std::string(e.what()).find("ibv_reg_mr"), std::string::npos) << e.what();
          throw;
        }
      },
      SystemError);
}

}  // namespace
}  // namespace ibdisk::rdma
