#pragma once
// Boost 1.74's Asio uses std::exchange without including <utility>; GCC 12 in C++20 mode
// then fails. Include Asio only through this header.
#include <utility>

#include <boost/asio.hpp>
