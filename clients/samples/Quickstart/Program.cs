// The README's C# example, whole: the test ReadmeSnippetTests holds README.md's ```csharp block
// equal to the lines between the markers below, and runs this program against a real broker.
//   dotnet run --project clients/samples/Quickstart     (DMABROKER_ADDRESS picks another broker)
using System.Text;

// <readme>
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

using var client = BrokerClient.Connect(Environment.GetEnvironmentVariable("DMABROKER_ADDRESS") ?? "http://127.0.0.1:50051");
await using var session = await client.OpenSessionAsync("my-driver");
var container = await session.NewContainerAsync(ContainerType.Type1V2);
await container.SetGroupAsync(14);                                   // VFIO_GROUP_SET_CONTAINER
var buffer = await session.AllocateAsync(8192);
await container.MapAsync(buffer, iova: 0x100000);                    // VFIO_IOMMU_MAP_DMA
await using var device = await session.OpenDeviceAsync("0000:08:00.0");
await device.EnableBusMasterAsync();
await using var dma = await device.OpenDmaChannelAsync();            // pipelined, batches small ops
(await dma.WriteAsync(0x100000, "hello"u8.ToArray())).EnsureOk();   // the device writes RAM
var written = await buffer.ReadAsync(0, 5);                          // what landed in our buffer
// </readme>

Console.WriteLine($"the device wrote '{Encoding.ASCII.GetString(written)}' through IOVA 0x100000 into session {session.Id}'s buffer");
