from shop.server import main

main()
