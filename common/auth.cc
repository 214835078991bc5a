#include "common/auth.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "common/error.h"

namespace ibdisk {

std::string read_key_file(const std::string& path, KeyUser user) {
  const std::string make =
      user == KeyUser::kPskFile ? "`ibdisk keygen --psktool " + path + "`" : "`ibdisk keygen " + path + "`";
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT && user == KeyUser::kInitiator) {
      throw SystemError("reading key file " + path, err,
                        "copy the target's key file here (the one its `ibdisk serve --key-file` reads); a new key "
                        "would not match it");
    }
    if (err == ENOENT) throw SystemError("reading key file " + path, err, "create one with " + make);
    throw SystemError("reading key file " + path, err, "check the path and the permissions of its directories");
  }
  if (!S_ISREG(st.st_mode)) {
    throw SystemError("key file " + path, std::string("not a regular file"), "give the file " + make + " wrote");
  }
  if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
    throw SystemError("key file " + path, std::string("group or others can read it (mode ") + mode + ")",
                      "run `chmod 600 " + path + "`");
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw SystemError("opening key file " + path, errno,
                      "run as its owner (uid " + std::to_string(st.st_uid) + ") or as root");
  }
  std::string key;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw SystemError("reading key file " + path, err);
    }
    key.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return key;
}

std::string load_key_file(const std::string& path, KeyUser user) {
  std::string key = read_key_file(path, user);
  const auto first = key.find_first_not_of(" \t\r\n");
  const auto last = key.find_last_not_of(" \t\r\n");
  key = first == std::string::npos ? std::string() : key.substr(first, last - first + 1);
  // psktool's format: one line of IDENTITY:HEXKEY.
  const auto colon = key.find(':');
  if (colon != std::string::npos && colon > 0 && key.find_first_of(" \t\r\n") == std::string::npos &&
      key.find_first_not_of("0123456789abcdefABCDEF", colon + 1) == std::string::npos) {
    key.erase(0, colon + 1);
  }
  if (key.size() < 16) {
    throw SystemError("key file " + path, "the key has " + std::to_string(key.size()) + " bytes, at least 16 are needed",
                      user == KeyUser::kInitiator ? "copy the target's key file here again"
                                                  : "create a new one with `ibdisk keygen FILE` and copy it to the initiators");
  }
  return key;
}

void write_new_key_file(const std::string& path, const std::string& prefix) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw SystemError("creating key file " + path, errno,
                      errno == EEXIST ? "it exists already; remove it first to replace the key" : "");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  const std::string raw = random_bytes(32);
  std::string text = prefix;
  for (const unsigned char c : raw) {
    text.push_back(kHex[c >> 4]);
    text.push_back(kHex[c & 0xf]);
  }
  text.push_back('\n');
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  const int err = errno;
  ::close(fd);
  if (!ok) throw SystemError("writing key file " + path, err);
}

Sha256 hmac_sha256(std::string_view key, std::string_view data) {
  Sha256 out{};
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
            data.size(), out.data(), &len) ||
      len != out.size()) {
    throw SystemError("HMAC-SHA256", std::string("OpenSSL refused"));
  }
  return out;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string random_bytes(std::size_t n) {
  std::string out(n, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    throw SystemError("RAND_bytes", std::string("OpenSSL's random generator failed"));
  }
  return out;
}

namespace {
std::string mac_of(std::string_view key, std::string_view label, std::string_view a, std::string_view b) {
  std::string msg(label);
  msg.append(a);
  msg.append(b);
  const Sha256 d = hmac_sha256(key, msg);
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}
}  // namespace

std::string client_mac(std::string_view key, std::string_view server_nonce, std::string_view client_nonce) {
  return mac_of(key, "ibdisk-auth-client-v1", server_nonce, client_nonce);
}

std::string server_mac(std::string_view key, std::string_view server_nonce, std::string_view client_nonce) {
  return mac_of(key, "ibdisk-auth-server-v1", client_nonce, server_nonce);
}

std::string join_proof(std::string_view session_secret, std::string_view server_nonce, std::string_view client_nonce) {
  return mac_of(session_secret, "ibdisk-join-v1", server_nonce, client_nonce);
}

}  // namespace ibdisk
